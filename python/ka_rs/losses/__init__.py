"""ka_rs.losses."""
