"""ka_rs.models."""
