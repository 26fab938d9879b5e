"""The Gradio demo, as a script: `python demos/app.py [BUNDLE] [--host H] [--port P] [--share]`.

Same as `kfdeploy demo`; see kfdeploy/demo.py.
"""
import sys

from kfdeploy.cli import main

if __name__ == "__main__":
    sys.exit(main(["demo", *sys.argv[1:]]))
