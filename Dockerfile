# maildetour in a container: Debian's Python, the package in a virtual environment, a system
# user, the state dir as a volume. Build: docker build -t maildetour .
# Run: see packaging/docker/compose.yaml (the config is mounted read-only).
FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates openssl \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --home-dir /var/lib/maildetour --shell /usr/sbin/nologin maildetour
COPY . /src
RUN python3 -m venv /opt/maildetour \
 && /opt/maildetour/bin/pip install --no-cache-dir /src \
 && rm -rf /src \
 && install -d -o maildetour -g maildetour -m 0700 /var/lib/maildetour
USER maildetour
VOLUME ["/var/lib/maildetour"]
# SMTP, POP3 (STLS), POP3 over TLS. Docker lets an unprivileged process bind them
# (net.ipv4.ip_unprivileged_port_start is 0 in containers).
EXPOSE 25 110 995
STOPSIGNAL SIGTERM
ENTRYPOINT ["/opt/maildetour/bin/maildetour"]
CMD ["serve", "--config", "/etc/maildetour/maildetour.toml"]
