# smap on CUDA 12: the demo by default, the tests with `docker run ... pytest -n auto`.
#
#   docker build -t smap .
#   docker run --gpus all smap                                   # the demo on the GPU(s)
#   docker run --gpus all smap python scripts/demo.py --mapping pmap
#   docker run --gpus all smap pytest -n auto                    # the test suite (CPU-emulated devices)
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-pip \
    && rm -rf /var/lib/apt/lists/*

RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /smap
COPY pyproject.toml README.md ./
COPY smap ./smap
COPY sharding ./sharding
RUN pip install ".[cuda12,demo,test]"
COPY scripts ./scripts
COPY tests ./tests
COPY docs ./docs

CMD ["python", "scripts/demo.py"]
