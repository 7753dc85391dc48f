"""Graph passes over the post-AOT ATen graph; the pipeline runs them in `pipeline.PASSES` order."""
