"""Command-line tools: thin ``main()`` functions over the library."""
