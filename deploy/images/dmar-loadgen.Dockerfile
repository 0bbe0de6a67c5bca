# dmar-loadgen on an empty base (see dmar-server.Dockerfile). Runs as root so that
# --output/--plot can write to a bind-mounted host folder (/out under compose).
FROM scratch
COPY rootfs/ /
WORKDIR /out
ENTRYPOINT ["/usr/local/bin/dmar-loadgen"]
