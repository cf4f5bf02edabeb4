import os
import re

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def read_version() -> str:
    with open(os.path.join(HERE, "remote_gevent", "__init__.py")) as f:
        return re.search(r'__version__ = "([^"]+)"', f.read()).group(1)


setup(
    name="remote-gevent",
    version=read_version(),
    description="Remote-access agent: end-to-end encrypted tunnels to devices behind NAT, "
    "controlled over AMQP-over-TLS",
    long_description=open(os.path.join(HERE, "README.md")).read(),
    long_description_content_type="text/markdown",
    packages=find_packages(exclude=["tests", "tests.*", "benchmarks"]),
    python_requires=">=3.8",
    install_requires=[
        "gevent>=20.9",
        "amqp>=5.0,<6",
        "paramiko>=2.7",
        "PyNaCl>=1.4",
        "PyYAML>=5.3",
        "click>=7.1",
    ],
    # relay: its optional Prometheus listener (metrics_listen); prometheus_client is the
    # reference exposition library every scraper reads.
    extras_require={"test": ["pytest>=6", "hypothesis>=6", "prometheus_client>=0.16"],
                    "relay": ["prometheus_client>=0.16"],
                    "lint": ["ruff", "vermin", "mypy==2.4.1", "types-PyYAML"]},
    entry_points={
        "console_scripts": [
            "remote-gevent=remote_gevent.agent.cli:main",
            "remote-gevent-relay=remote_gevent.relay.cli:main",
            "remote-gevent-console=remote_gevent.console.cli:main",
        ]
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: 3.8",
        "Operating System :: POSIX :: Linux",
    ],
)
