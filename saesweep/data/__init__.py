"""Reading stored activations."""
