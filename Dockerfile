# tessera: one image, configured entirely by TESSERA_* environment variables.
# Built from the wheel, as a user installs it: the migrations ship inside the package.
FROM python:3.12-slim AS build
WORKDIR /src
COPY pyproject.toml README.md LICENSE ./
COPY src ./src
RUN pip wheel --no-deps -w /wheels .

FROM python:3.12-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN useradd --system --uid 10001 --home-dir /srv/tessera tessera
COPY --from=build /wheels /wheels
RUN pip install /wheels/*.whl && rm -rf /wheels && mkdir -p /srv/tessera/data \
    && chown tessera /srv/tessera/data
WORKDIR /srv/tessera
USER tessera
ENV TESSERA_DATA_DIR=/srv/tessera/data
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s CMD python -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)" || exit 1
CMD ["tessera", "serve", "--host", "0.0.0.0", "--port", "8000", "--workers", "2", "--proxy-headers"]
