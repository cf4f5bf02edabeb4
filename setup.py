import os
import re

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def read_version() -> str:
    with open(os.path.join(HERE, "remote_gevent", "__init__.py")) as f:
        return re.search(r'__version__ = "([^"]+)"', f.read()).group(1)


# Python 3.8+ gets current releases. 3.6 and 3.7 (old field distributions: RHEL/CentOS 8,
# CentOS 7, Ubuntu 18.04, Debian 10) get the last releases published for them, capped here
# so that even a pip that ignores Requires-Python cannot pick one that no longer installs
# there. Checked: every one installs as a binary wheel (manylinux2014 x86_64 and aarch64).
PY36 = "python_version < '3.7'"
PY37 = "python_version == '3.7'"
OLD = "python_version < '3.8'"
NEW = "python_version >= '3.8'"
INSTALL_REQUIRES = [
    "gevent>=20.9; " + NEW,
    "gevent>=22.10.2,<23; " + OLD,  # 22.10.2: the last gevent for 3.6 and 3.7
    "greenlet>=2.0.2,<3; " + OLD,  # gevent 22.10 is built against greenlet 2
    "amqp>=5.0,<6",  # 5.3.1 still supports 3.6
    "paramiko>=2.7; " + NEW,
    "paramiko>=2.7,<3.6; " + OLD,  # 3.5.1
    "PyNaCl>=1.4; " + NEW,
    "PyNaCl>=1.4,<1.6; " + OLD,  # 1.5.0 (it has no AES-GCM binding: XChaCha20 is used)
    "PyYAML>=5.3; " + NEW,
    "PyYAML>=5.3,<6.0.2; " + OLD,  # 6.0.1
    "click>=7.1; " + NEW,
    "click>=7.1,<8.1; " + PY36,  # 8.0.4
    "click>=7.1,<8.2; " + PY37,  # 8.1.8
    "cryptography<41; " + PY36,  # paramiko's; 40.0.2 is the last for 3.6
    "dataclasses>=0.8; " + PY36,  # the 3.7 standard library module, backported
]

setup(
    name="remote-gevent",
    version=read_version(),
    description="Remote-access agent: end-to-end encrypted tunnels to devices behind NAT, "
    "controlled over AMQP-over-TLS",
    long_description=open(os.path.join(HERE, "README.md")).read(),
    long_description_content_type="text/markdown",
    packages=find_packages(exclude=["tests", "tests.*", "benchmarks"]),
    # The agent runs on 3.6+ (issue 16); the relay and the console need 3.8 and say so.
    python_requires=">=3.6",
    install_requires=INSTALL_REQUIRES,
    # relay: its optional Prometheus listener (metrics_listen); prometheus_client is the
    # reference exposition library every scraper reads (the relay is 3.8+).
    extras_require={"test": ["pytest>=6", "hypothesis>=6",
                             "prometheus_client>=0.16; python_version >= '3.8'"],
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
        "Programming Language :: Python :: 3.6",
        "Programming Language :: Python :: 3.7",
        "Programming Language :: Python :: 3.8",
        "Operating System :: POSIX :: Linux",
    ],
)
