"""Everything that runs checkpoints forward: the batched probe engine, token sets, benchmark scoring."""
