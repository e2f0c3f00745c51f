"""Where replies come from: the hub that holds the current backend."""
