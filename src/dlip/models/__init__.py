"""Model code: vision and text towers, the BLIP class, presets, conversion."""
