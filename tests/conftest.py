import sys
from pathlib import Path

# shared test helpers (tiny.py) import as top-level modules
sys.path.insert(0, str(Path(__file__).parent))
