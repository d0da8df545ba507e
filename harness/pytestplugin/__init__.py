"""pytest plugin of pgtable-harness (entry point ``pgtable_harness``)."""
