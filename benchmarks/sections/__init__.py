"""One module per section of the table; each has `run(bed, params) -> List[Row]`."""
