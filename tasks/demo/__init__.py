"""The built-in demo model and the small world it is trained and evaluated on."""
