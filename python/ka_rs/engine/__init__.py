"""ka_rs.engine."""
