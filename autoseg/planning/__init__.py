"""Planning: typed plans (JSON with schema version) and the pure rules that derive them."""
