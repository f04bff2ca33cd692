"""The files satcli writes and reads: results Parquet files (rows, metadata, reading, writing, merging)."""
