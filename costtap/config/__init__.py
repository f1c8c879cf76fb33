"""Settings from flags and the environment, validated before anything starts."""
