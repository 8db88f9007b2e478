"""Reading and writing volumes with their geometry, and dataset discovery/validation."""
