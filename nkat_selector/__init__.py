"""Start-up backend choice: probe the machine and the model (``probe``), decide between
this runtime and a stock Kobold.cpp (``rules``), launch the winner and wait until it answers
(``launch``). ``backend_selector.py`` at the repository root is the command."""
