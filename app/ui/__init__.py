"""The web dashboard at /ui: static HTML, CSS and JavaScript that call the public API from the browser."""
