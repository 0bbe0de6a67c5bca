# Prometheus on an empty base, from the host's Debian `prometheus` package (a Go binary
# linked against libc only), with promtool beside it and dmar's scrape configuration.
# Same layout as the official image (/bin/prometheus, /etc/prometheus, /prometheus), so
# docker-compose.yml runs either one.
FROM scratch
COPY rootfs/ /
EXPOSE 9090
VOLUME ["/prometheus"]
WORKDIR /prometheus
ENTRYPOINT ["/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]
