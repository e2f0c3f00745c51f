"""The portal's Streamlit layer: what several pages share (process-wide resources, access, the model card, message
rendering, sidebar sections) and the parts of the chat page. Logic lives in glm_core; this package only draws."""
