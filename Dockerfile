# bot_toolkit standalone bot.
#
#   docker build -t bot-toolkit .
#   docker run -d --name bot \
#     -v "$PWD/config.toml:/config/config.toml:ro" \
#     -v bot-data:/data \
#     -e BOT_TOOLKIT_PASSWORD=... -e BOT_TOOLKIT_ADMIN_TOKEN=... \
#     bot-toolkit
#
# Configuration: a TOML file at $BOT_TOOLKIT_CONFIG (/config/config.toml; it must be readable by
# uid 10001), or only environment variables: run with -e BOT_TOOLKIT_CONFIG= and
# BOT_TOOLKIT_MATRIX_HOMESERVER, BOT_TOOLKIT_MATRIX_USER_ID, ... (see config.example.toml).
# State (device keys, session, database) lives in the /data volume: keep it across upgrades.
# Plugins: mount a folder of modules at /plugins (on the module path) and name them in
# [plugins] modules or BOT_TOOLKIT_PLUGINS_MODULES, or build FROM this image and pip install yours
# into /opt/venv (README: "Plugins").
# The HTTP endpoints listen on 127.0.0.1 unless http.host says otherwise (e.g. "0.0.0.0" to
# publish the port); the HEALTHCHECK runs inside the container, so it works either way.

ARG BASE_IMAGE=python:3.12-slim

# ---- build: a virtualenv (without pip) holding bot_toolkit and its dependencies
FROM ${BASE_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
RUN python -m venv --without-pip /opt/venv
WORKDIR /src
# Dependencies first: changing the code does not reinstall them.
COPY pyproject.toml ./
RUN python -c "import tomllib; \
print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
      > requirements.txt \
 && python -m pip --python /opt/venv/bin/python install -r requirements.txt
COPY . .
RUN python -m pip --python /opt/venv/bin/python install --no-deps . \
 && /opt/venv/bin/bot-toolkit --version

# ---- runtime
FROM ${BASE_IMAGE}
LABEL org.opencontainers.image.title="bot_toolkit" \
      org.opencontainers.image.description="Matrix bot: verifiable from Element, sends m.room_key.withheld notices" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    BOT_TOOLKIT_CONFIG=/config/config.toml \
    BOT_TOOLKIT_STORAGE_DATA_DIR=/data \
    PYTHONPATH=/plugins
RUN groupadd --system --gid 10001 bot \
 && useradd --system --uid 10001 --gid bot --home-dir /data --no-create-home \
      --shell /usr/sbin/nologin bot \
 && mkdir -p /data /config /plugins \
 && chown bot:bot /data \
 && chmod 0700 /data
COPY --from=build /opt/venv /opt/venv
COPY config.example.toml /config/config.example.toml
USER 10001:10001
WORKDIR /data
VOLUME ["/data"]
EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 \
  CMD ["bot-toolkit", "healthcheck", "--timeout", "5"]
ENTRYPOINT ["bot-toolkit"]
CMD ["run"]
