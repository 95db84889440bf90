"""Model code: config, vision and text towers, the BLIP class, generation, presets, the saved
form (`io.resolve`: a preset name or a model directory), conversion, student init, counting."""
