"""Ops: pure functions `(inputs, gates, initial_state) -> (output, final_state)`."""
