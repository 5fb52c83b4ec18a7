import os
import sys

# tests/oracles.py holds the independent implementations the tests compare against.
sys.path.insert(0, os.path.dirname(__file__))
