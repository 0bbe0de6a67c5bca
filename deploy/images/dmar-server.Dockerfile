# dmar-server on an empty base: the host-built release binary, the shared libraries `ldd`
# lists, the dynamic loader, and the gRPC health probe. Assembled by deploy/build-images.sh,
# which lays the files out under rootfs/ beside this file (no registry needed).
FROM scratch
COPY rootfs/ /
# The gRPC port speaks mutual TLS (DMAR_TLS_DIR); the probe, which speaks cleartext
# HTTP/2 only, asks a health-only port on the container's loopback.
ENV DMAR_LISTEN=0.0.0.0:50051 \
    DMAR_METRICS_LISTEN=0.0.0.0:9464 \
    DMAR_HEALTH_LISTEN=127.0.0.1:50052
EXPOSE 50051 9464
USER 65534:65534
HEALTHCHECK --interval=2s --timeout=3s --start-period=2s --retries=15 \
    CMD ["/usr/local/bin/dmar-healthcheck", "127.0.0.1:50052"]
ENTRYPOINT ["/usr/local/bin/dmar-server"]
