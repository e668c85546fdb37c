"""saesweep: collect language-model activations once, train sweeps of sparse autoencoders on them."""
