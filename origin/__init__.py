"""Everything that owns data: sequencing, the log of record, stores, tenancy, admin API."""
