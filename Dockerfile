# iumask with its CLI as the entrypoint. The torch wheel pip resolves includes CUDA; run with
# `docker run --gpus all ...` to use a GPU, or as is on the CPU.
FROM python:3.11-slim

RUN apt-get update \
    && apt-get install -y --no-install-recommends libgl1 libglib2.0-0 \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/iumask
COPY pyproject.toml README.md ./
COPY iumask ./iumask
RUN pip install --no-cache-dir .

WORKDIR /work
ENTRYPOINT ["iumask"]
CMD ["--help"]
