# pgtable-harness on Debian 12: the same setup script the README and CI use.
FROM debian:12
RUN apt-get update -q && apt-get install -y -q --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . /src
RUN bash ci/setup.sh
ENV PATH=/src/.venv/bin:$PATH
# Main job by default; `docker run IMAGE bash ci/test.sh` runs the tests.
CMD ["bash", "ci/main.sh"]
