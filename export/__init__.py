"""Installed as `kfdeploy.profiles` (setup.cfg's package_dir): the export profiles in this
folder ship inside the package, and kfdeploy/bundling/export.py reads them from there."""
