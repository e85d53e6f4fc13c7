"""The shipped prompt sets, shipped inside the wheel as `pipeline.prompts` (`pkg:prompts/<file>` in a prompts preset)."""
