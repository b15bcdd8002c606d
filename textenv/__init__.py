"""TextEnv: text generation as a Gymnasium environment."""
