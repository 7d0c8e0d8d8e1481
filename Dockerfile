# Multi-stage build of the sluice binary. Not exercised by CI (no container
# engine on the CI machines); see docs/operations.md.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p sluice

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* && useradd --system --uid 10001 sluice
COPY --from=build /src/target/release/sluice /usr/local/bin/sluice
USER sluice
ENTRYPOINT ["sluice"]
CMD ["serve"]
