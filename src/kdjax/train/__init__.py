"""Training: the optimiser recipe, pure step factories, the chunked scan loop and the evaluator."""
