"""Safety: an input filter, an in-generation monitor and an output check around the model."""
