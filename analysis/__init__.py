"""Analysis: imaging, the vision client, findings and the structured report (later issues)."""
