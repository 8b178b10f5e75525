# CPU image running `llamaserve serve` with the original's environment and volume layout.
#
#   docker build -t llamaserve .
#   docker run -p 7000:7000 -v /path/to/Meta-Llama-3-8B-Instruct:/weights:ro -v llamaserve-cache:/cache \
#       -e JWT_SECRET=... llamaserve
#
# /weights: a checkpoint directory (Meta shards, repacked chunks or Hugging Face safetensors);
# left empty, the server runs the built-in random model. /cache: logs and the converted-weight
# cache, so a restarted container memory-maps converted weights instead of converting again.
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1

# torch first and from the CPU index, so that no dependency resolves a CUDA build.
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu

WORKDIR /opt/llamaserve
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install . && rm -rf /root/.cache

RUN useradd --create-home --uid 1000 llama \
    && mkdir -p /cache /weights \
    && chown llama:llama /cache /weights
USER llama

ENV CACHE_ROOT=/cache \
    MODEL_WEIGHTS_PATH=/weights \
    SERVICE_PORT=7000
VOLUME ["/cache", "/weights"]
EXPOSE 7000

# Loading a large model takes minutes: the start period covers it before failures count.
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request; url = 'http://127.0.0.1:%s/health' % os.environ.get('SERVICE_PORT', '7000'); sys.exit(0 if urllib.request.urlopen(url, timeout=4).status == 200 else 1)"]

# An empty /weights volume means "no weights given": serve the built-in model (it says so).
ENTRYPOINT ["/bin/sh", "-c", "if [ -z \"$(ls -A \"$MODEL_WEIGHTS_PATH\" 2>/dev/null)\" ]; then echo \"llamaserve: $MODEL_WEIGHTS_PATH is empty: serving the built-in random model\" >&2; unset MODEL_WEIGHTS_PATH; fi; exec llamaserve serve \"$@\"", "llamaserve"]
CMD []
