#!/bin/sh
# A user's current BEAT embedding from Feast's feature server, with nothing but curl: what a
# personalization service does on each request.
#
#   examples/personalization_lookup.sh http://127.0.0.1:6566 u000042 [u000043 ...]
#
# Asks `feast serve` (started in feature_repo/: `feast apply && feast serve`) for the feature
# service user_embedding_current, the current model version's view, and prints the server's
# JSON as it comes: metadata.feature_names (user_id, then embedding, model_version,
# event_count and last_event_time, in the server's order: look them up by name), and
# results, one entry per name, each with "values" (one per user, in the order asked),
# "statuses" (PRESENT, or NOT_FOUND for a user without an embedding) and "event_timestamps"
# (as of when each embedding was computed). last_event_time is in epoch seconds. Compare
# embeddings only within one model_version.
#
# Exit status: curl's; 22 for an HTTP error (the server's reply on stdout, curl's line on
# stderr), 2 for a wrong command line.
set -eu

if [ "$#" -lt 2 ]; then
    echo "usage: $0 FEATURE_SERVER_URL USER_ID [USER_ID ...]" >&2
    exit 2
fi
url=${1%/}
shift

# The user ids as a JSON array. Ids with a double quote or a backslash would need JSON
# escaping; beatstream's user ids are Kafka keys, and this example assumes plain ones.
ids=""
for user in "$@"; do
    ids="$ids${ids:+,}\"$user\""
done

curl --silent --show-error --fail-with-body --max-time 5 \
    -X POST "$url/get-online-features" \
    -H 'Content-Type: application/json' \
    -d "{\"feature_service\": \"user_embedding_current\", \"entities\": {\"user_id\": [$ids]}}"
echo
