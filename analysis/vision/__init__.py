"""The vision API side: wire formats, providers, limits and token estimates."""
