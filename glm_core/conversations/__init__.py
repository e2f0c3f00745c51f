"""Conversations as the store keeps them: records, the store, export/import, one chat turn, workspaces. No torch."""
