"""ka_rs.data."""
