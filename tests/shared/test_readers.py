"""Every reader on small files the test writes, and every bad-input case with its message."""
import pandas as pd
import pytest

from fedrec.shared.data.readers import (ColumnMap, read_catalog_table, read_ml100k, read_ml1m,
                            read_movielens_csv, read_recbole, read_table)
from fedrec.shared.data.schema import DataError, check_items_known
from tests.conftest import write

U_ITEM = ("1|Toy Story (1995)|01-Jan-1995||http://x|0|0|0|1|1|1|0|0|0|0|0|0|0|0|0|0|0|0|0\n"
          "2|Caf\xe9 Society (1995)|01-Jan-1995||http://x|0|0|0|0|0|0|0|0|1|0|0|0|0|0|0|0|0|0|0\n")


def ml100k(tmp_path, data="1\t1\t5\t100\n1\t2\t3\t90\n2\t2\t4\t50\n", item=U_ITEM):
    write(tmp_path / "u.data", data)
    write(tmp_path / "u.item", item, encoding="latin-1")
    return tmp_path


def test_ml100k_reads_latin1_titles_genres_and_sorts_by_time(tmp_path):
    interactions, catalog = read_ml100k(ml100k(tmp_path))
    f = interactions.frame
    assert list(f["user"]) == ["1", "1", "2"]
    assert list(f["item"]) == ["2", "1", "2"]          # user 1 sorted by time
    assert list(f["line"]) == [2, 1, 3]                # lines follow the rows
    assert list(f["rating"]) == [3.0, 5.0, 4.0]
    assert catalog.frame.loc["2", "title"] == "Caf\xe9 Society (1995)"
    assert catalog.frame.loc["1", "genres"] == ("Animation", "Children's", "Comedy")
    assert catalog.frame.loc["1", "year"] == 1995


def test_equal_timestamps_keep_file_order(tmp_path):
    interactions, _ = read_ml100k(ml100k(tmp_path, data="1\t2\t5\t100\n1\t1\t3\t100\n"))
    assert list(interactions.frame["item"]) == ["2", "1"]


def test_malformed_line_too_many_fields(tmp_path):
    with pytest.raises(DataError, match=r"u\.data:2: malformed line: expected 4 fields, found 5"):
        read_ml100k(ml100k(tmp_path, data="1\t1\t5\t100\n1\t2\t3\t90\t7\n"))


def test_malformed_line_too_few_fields(tmp_path):
    with pytest.raises(DataError, match=r"u\.data:3: malformed line: expected 4 fields, found 3"):
        read_ml100k(ml100k(tmp_path, data="1\t1\t5\t100\n1\t2\t3\t90\n2\t2\t4\n"))


def test_blank_lines_are_skipped_and_line_numbers_stay_true(tmp_path):
    with pytest.raises(DataError, match=r"u\.data:4: field 'timestamp': unparseable timestamp"):
        read_ml100k(ml100k(tmp_path, data="1\t1\t5\t100\n\n\n1\t2\t3\tyesterday\n"))


def test_unparseable_timestamp(tmp_path):
    with pytest.raises(DataError) as err:
        read_ml100k(ml100k(tmp_path, data="1\t1\t5\t100\n1\t2\t3\tnot-a-time\n"))
    assert err.value.line == 2 and err.value.field == "timestamp"
    assert "'not-a-time'" in str(err.value)


def test_rating_not_a_number(tmp_path):
    with pytest.raises(DataError, match=r"u\.data:1: field 'rating': not a number: 'five'"):
        read_ml100k(ml100k(tmp_path, data="1\t1\tfive\t100\n"))


def test_unknown_item_names_file_line_and_field(tmp_path):
    interactions, catalog = read_ml100k(ml100k(tmp_path, data="1\t1\t5\t100\n1\t99\t3\t90\n"))
    with pytest.raises(DataError, match=r"u\.data:2: field 'item': unknown item '99'"):
        check_items_known(interactions, catalog)


def test_duplicate_item_ids_name_both_lines(tmp_path):
    item = U_ITEM + U_ITEM.splitlines(keepends=True)[0]
    with pytest.raises(DataError, match=r"u\.item:3: field 'item': duplicate item id '1' \(first defined on line 1\)"):
        read_ml100k(ml100k(tmp_path, item=item))


def test_wrong_encoding_names_the_line(tmp_path):
    write(tmp_path / "ratings.csv", "userId,movieId,rating,timestamp\n1,1,4.0,100\n1,2,3.0,90\n")
    write(tmp_path / "movies.csv", "movieId,title,genres\n1,Toy Story (1995),Comedy\n2,Caf\xe9 (1999),Drama\n",
          encoding="latin-1")
    with pytest.raises(DataError, match=r"movies\.csv:3: not valid utf-8 \(byte 0xe9 at column 6\)"):
        read_movielens_csv(tmp_path)


def test_genre_flag_must_be_binary(tmp_path):
    with pytest.raises(DataError, match=r"u\.item:1: field 'Action': genre flag must be 0 or 1, found '7'"):
        read_ml100k(ml100k(tmp_path, item=U_ITEM.replace("|0|0|0|1|1|1", "|0|7|0|1|1|1", 1)))


def test_movielens_csv_with_tags_and_years(tmp_path):
    write(tmp_path / "ratings.csv", "userId,movieId,rating,timestamp\n1,1,4.0,100\n1,2,3.5,90\n")
    write(tmp_path / "movies.csv", 'movieId,title,genres\n1,"American President, The (1995)",Comedy|Drama\n'
          "2,Nothing,(no genres listed)\n")
    write(tmp_path / "tags.csv", "userId,movieId,tag,timestamp\n1,1,Funny,5\n2,1,funny,6\n1,1,politics,7\n")
    interactions, catalog = read_movielens_csv(tmp_path)
    assert list(interactions.frame["rating"]) == [3.5, 4.0]
    c = catalog.frame
    assert c.loc["1", "title"] == "American President, The (1995)" and c.loc["1", "year"] == 1995
    assert c.loc["1", "genres"] == ("Comedy", "Drama") and c.loc["2", "genres"] == ()
    assert c.loc["1", "tags"] == ("funny", "politics")        # most frequent first, lower-cased
    assert pd.isna(c.loc["2", "year"])


def test_movielens_csv_header_must_have_columns(tmp_path):
    write(tmp_path / "ratings.csv", "user,movie,rating,timestamp\n1,1,4.0,100\n")
    write(tmp_path / "movies.csv", "movieId,title,genres\n1,A (1995),Comedy\n")
    with pytest.raises(DataError, match=r"ratings\.csv:1: header lacks column\(s\) \['userId', 'movieId'\]"):
        read_movielens_csv(tmp_path)


def test_ml1m_double_colon_latin1(tmp_path):
    write(tmp_path / "ratings.dat", "1::10::5::978300760\n1::20::3::978302109\n")
    write(tmp_path / "movies.dat", "10::Caf\xe9 (1995)::Comedy|Romance\n20::Heat (1995)::Action\n", encoding="latin-1")
    interactions, catalog = read_ml1m(tmp_path)
    assert list(interactions.frame["item"]) == ["10", "20"]
    assert catalog.frame.loc["10", "title"] == "Caf\xe9 (1995)"
    assert catalog.frame.loc["10", "genres"] == ("Comedy", "Romance")
    write(tmp_path / "ratings.dat", "1::10::5::978300760\n1::20::3\n")
    with pytest.raises(DataError, match=r"ratings\.dat:2: malformed line: expected 4 fields, found 3"):
        read_ml1m(tmp_path)


def test_recbole_atomic_files(tmp_path):
    inter = write(tmp_path / "x.inter", "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
                  "7\t1\t4\t881250949\n7\t2\t5\t881250950\n")
    item = write(tmp_path / "x.item", "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
                 "1\tToy Story\t1995\tAnimation Comedy\n2\tHeat\t1995\tAction\n")
    interactions, catalog = read_recbole(inter, item)
    assert list(interactions.frame["line"]) == [2, 3]
    assert catalog.frame.loc["1", "genres"] == ("Animation", "Comedy")
    bad = write(tmp_path / "y.inter", "user_id:token\titem_id:token\n7\t1\n")
    with pytest.raises(DataError, match=r"y\.inter:1: atomic header lacks 'timestamp:\.\.\.'"):
        read_recbole(bad)


def test_generic_csv_with_iso_dates_and_column_map(tmp_path):
    path = write(tmp_path / "log.csv", "who,what,when\na,x,2024-01-02T10:00:00Z\na,y,2024-01-01\n")
    interactions = read_table(path, ColumnMap(user="who", item="what", timestamp="when"))
    assert list(interactions.frame["item"]) == ["y", "x"]
    assert interactions.frame["timestamp"].iloc[0] == 1704067200


def test_generic_parquet(tmp_path):
    path = tmp_path / "log.parquet"
    pd.DataFrame({"user": [1, 1], "item": [5, 6], "timestamp": [10, 20]}).to_parquet(path)
    interactions = read_table(path)
    assert list(interactions.frame["item"]) == ["5", "6"]
    pd.DataFrame({"user": [1], "item": [5]}).to_parquet(path)
    with pytest.raises(DataError, match=r"log\.parquet: lacks column\(s\) \['timestamp'\]"):
        read_table(path)


def test_generic_catalog_csv(tmp_path):
    path = write(tmp_path / "items.csv", "item,title,genres\nx,Alpha (2001),A|B\ny,Beta,\n")
    catalog = read_catalog_table(path)
    assert catalog.frame.loc["x", "genres"] == ("A", "B") and catalog.frame.loc["x", "year"] == 2001


def test_missing_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match=r"u\.data: file not found"):
        read_ml100k(tmp_path)
