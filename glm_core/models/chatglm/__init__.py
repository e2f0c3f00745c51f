"""The ChatGLM families in their original THUDM layout: checkpoints and tokenizers."""
