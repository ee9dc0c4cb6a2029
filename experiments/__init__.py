"""vlax entry points and configs."""
