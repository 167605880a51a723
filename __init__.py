"""Not part of the lossgraph package: this file makes `import lossgraph` work from the folder
that holds a clone of this repository.

Note [Running beside the clone]: from the parent folder of a clone named `lossgraph`, Python finds
the clone itself first (it is on sys.path as the current folder); without this file it would be
an empty namespace package that shadows the installed lossgraph (an editable install's finder
runs after it), and `lossgraph.compile` would be a confusing AttributeError. With this file the
clone's package (lossgraph/ inside it) is imported instead, the same code an editable install
of the clone runs, just as running from inside the clone would.
"""
import os as _os

if __name__ == "lossgraph":   # imported under another name (a differently named clone): inert
    __path__ = [_os.path.join(_os.path.dirname(_os.path.abspath(__file__)), "lossgraph")]
    __file__ = _os.path.join(__path__[0], "__init__.py")
    with open(__file__, encoding="utf-8") as _f:
        exec(compile(_f.read(), __file__, "exec"))
    del _f
